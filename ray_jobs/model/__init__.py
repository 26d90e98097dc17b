"""The twin-tower model: checkpoint format, tower layouts, stage layouts and staged execution."""
