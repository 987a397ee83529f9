"""The one-command demo (``hubflow-demo`` / ``python -m demo``): the whole product, offline.

It sits above both ``pipeline`` and ``training`` and drives them through their public entry
points, as a user would.
"""
