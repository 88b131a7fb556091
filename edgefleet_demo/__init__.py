"""The main job in one command (`make demo`): a whole fleet, end to end, on loopback."""
