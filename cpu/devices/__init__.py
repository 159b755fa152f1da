"""Device models the machine maps into guest physical space. Pure Python: no module here
imports the engine; the machine wires each model to its MMIO window."""
