"""edgefleet model packager: quantized, evaluated, signed packages for CPU/ARM targets."""
