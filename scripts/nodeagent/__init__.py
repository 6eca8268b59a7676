"""Process nodes for the local control plane: a node agent that plays the kubelet for real, running every pod
bound to its nodes as processes with their own network namespace, root file system, volumes, probes and
restarts. Development and test tooling; see `python -m nodeagent --help` (with scripts/ on sys.path)."""
