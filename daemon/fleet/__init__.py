"""A fleet of edge devices on one machine: real and simulated devices, their Prometheus servers and
vmagents, the central store, vmalert, the clustered Alertmanager pair (docs/fleet.md)."""
