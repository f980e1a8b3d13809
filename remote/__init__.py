"""What runs on the rented machine: config schema, dataset layout, bootstrap, watchdog, trainer.

Nothing here imports ``rentrain`` or ``providers``: this folder is shipped to a bare GPU box as files.
"""
