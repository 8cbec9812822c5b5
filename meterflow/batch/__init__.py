"""The batch layer: daily views and roll-ups of the lake, lake retention."""
