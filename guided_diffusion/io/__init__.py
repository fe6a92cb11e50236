"""
Files in and out: rasters (reading, scaling, GeoTIFF writing), checkpoints (naming,
finding, reading), the results folder of a sampling run, and pictures.
"""
