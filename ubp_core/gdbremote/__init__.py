"""The GDB remote serial protocol: a Target for any stub (qemu-user, gdbserver, ...).

- :mod:`.protocol`: packets over a socket;
- :mod:`.tdesc`: the stub's register layout from its target description;
- :mod:`.signals`: GDB's signal numbers versus the host's;
- :mod:`.target`: :class:`~.target.GdbRemoteTarget`, registers, memory, execution;
- :mod:`.inject`: system calls made on behalf of a stopped thread.
"""
