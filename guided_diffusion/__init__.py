"""Conditional diffusion for SAR-to-optical image translation."""
