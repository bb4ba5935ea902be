"""cfsdeploy: versioned, verified root-filesystem deployments on composefs."""

__version__ = "0.1.0"
