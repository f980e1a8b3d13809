"""One adapter per GPU market, plain HTTP against each provider's documented API."""

import logging

# A library logs; the application decides where it goes (without this, warnings would reach stderr unasked).
logging.getLogger(__name__).addHandler(logging.NullHandler())
