"""The on-disk contract: the store's layout and attributes (``_format``) and the shard files
themselves (``_shardio``: the sharding codec's byte layout, its index and checksum).

Both the packer (which writes stores) and the reader (which reads them) build on this package
and on nothing else of shardfit's.
"""
