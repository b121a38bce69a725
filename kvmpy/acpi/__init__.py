"""ACPI for kvmpy's machine: the tables (tables.py, aml.py), the fixed hardware registers
and PM timer (pm.py), and the S3/S5 sleep states (sleep.py)."""
