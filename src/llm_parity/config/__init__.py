"""What the run is asked to do: options, the thresholds file, prompt sets, checkpoint
paths; all validated before any model loads."""
