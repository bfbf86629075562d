"""Packing, in data-flow order: scan a folder (``_scan``) -> shuffle and split (``_plan``) ->
decode each file (``_decode``) in worker processes (``_pool``) -> write shards and arrays
(``_writer``); ``_pack`` runs the whole job, ``options`` holds its validated options.

Nothing here imports a deep-learning framework.
"""
