"""Model families: one folder each (config table, layer spec, weight mapping), plus shared pieces."""
