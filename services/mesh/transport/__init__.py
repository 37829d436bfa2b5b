"""The transport layer: frames, links, peers, and the link implementations of the next-hop
protocols (`linked`)."""
