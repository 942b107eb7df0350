"""Files in and out: every model file format, its names, layout and loaders, and llamalite's own run directories."""
