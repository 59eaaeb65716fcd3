"""The method registry: name -> ``SSLMethod`` subclass."""

from ssl_lib.registry import Registry

METHODS: Registry = Registry("method")
