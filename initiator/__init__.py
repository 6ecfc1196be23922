"""blockfs's NVMe-over-TCP host: sans-IO codecs and state machines plus a trio shell."""
