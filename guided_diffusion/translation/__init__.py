"""
Translating SAR into optical images: loading a checkpoint, the typed jobs, the
folder job, the scene job (tiles fused at every step), several samples per input.
"""
