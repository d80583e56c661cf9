"""Routes outside the protocol table (``api/protocols/``): the operations routes and the admin API."""
