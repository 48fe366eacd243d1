"""netboot: network-boot provisioning server for edge Kubernetes fleets."""

__version__ = "0.1.0"
