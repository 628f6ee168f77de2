"""Importance matrices computed from a Hugging Face checkpoint (torch / transformers, imported lazily).

The file format lives in gguforge.format.imatrix; this package runs the model over calibration text
and maps what it sees onto the GGUF tensor names of the converted model (compute.py).
"""
