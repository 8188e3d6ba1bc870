"""Small helpers with no megafusion dependencies, shared by preprocessing, data and checkpoints."""
