"""HTTP surfaces other than XCAP: the metrics and health listener."""
