"""
Files in and out: rasters (reading, scaling), GeoTIFFs (writing, warping), checkpoints (naming,
finding, reading), the results folder of a sampling run, and pictures.
"""
