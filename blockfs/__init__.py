"""blockfs: what users touch: the FUSE filesystem, the NBD server, hotplug scripts, the control socket and the CLI."""
