"""Replies: a reply's whole life, from the row a turn adds to its stored end.

`service.Replies` is the package's face. Beneath it: the runner (the algorithm: call the model,
run tool rounds), the store (writes that survive the database), the repository (every statement
that writes a reply row), the status rules, the live reply and its bus (what followers see),
the registry of running replies, the keeper (checkpoints and the sweep) and the follower.
"""
