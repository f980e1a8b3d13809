"""One adapter per GPU market, plain HTTP against each provider's documented API."""
