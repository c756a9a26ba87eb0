"""vlmguard: live HLS, archives and VLM safety analysis for IP cameras on one edge box."""

__version__ = "0.1.0"
