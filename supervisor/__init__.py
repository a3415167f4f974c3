"""adapter-supervisor: owns adapter process trees on behalf of orchestrators."""

__version__ = "0.1.0"
