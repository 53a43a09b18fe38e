"""Mesh membership: the owner key, member certificates, invites, revocations, the policy.

A mesh is its owner's Ed25519 key. The owner signs a compact certificate for each member's
peer id; every entry point asks :class:`~mesh.trust.policy.MembershipPolicy` whether a peer's
certificate admits it. This room sits above mesh.net's identity and RPC and below everything
that meets strangers (discovery, the node); it imports neither discovery nor services.
"""
