"""The domain: records, ids and names, URIs, archive and request formats, the rules.

Plain data and pure functions; nothing here imports another layer of the project.
"""
