"""What every stage shares: atomic files, output rules, locks, signals, TensorFlow logging, devices."""
