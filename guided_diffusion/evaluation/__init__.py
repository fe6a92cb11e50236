"""
Scoring translations: image metrics and FID, the calibration of the spread, and
validation during training.
"""
