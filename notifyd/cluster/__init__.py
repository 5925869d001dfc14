"""The cluster stream: every node's records on NATS JetStream (docs/ABI.md section 6).

``wire`` is the format (no NATS import); ``forward`` is the forwarder's
process; ``consume`` the asyncio consumer; ``bridge`` runs it for trio
programs in a thread; ``watch`` is ``scoutfs-notify watch --nats``.
"""
