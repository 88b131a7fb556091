"""The hardening suite (issue 8): every attack built for real against the real code, each asserting the clear
error AND that nothing else changed (active model, trust store, counters) AND that inference still answers."""
