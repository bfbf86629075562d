"""Stores in object storage (S3, GCS, Azure), in data-flow order: the client that fetches and
uploads objects (``_client``, on obstore) -> the local, bounded cache of whole shard files that
readers read from (``_cache``); and a packed store uploaded to object storage (``_upload``).

Nothing here imports a deep-learning framework.
"""
