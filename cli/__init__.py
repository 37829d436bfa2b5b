"""The `infermesh` command line: it talks to the registry and the control API over HTTP and
starts the mesh (`infermesh up`, through deploy/). Nothing below it imports it."""
