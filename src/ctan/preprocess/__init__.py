"""Preprocessing: resampling to the configured grid (`resample`), intensity normalisation for the loader
(`intensity`), and the `ctan preprocess` command that writes the Zarr stores (`pipeline`).

Submodules are imported where used, so importing `ctan.preprocess.intensity` stays cheap.
"""
