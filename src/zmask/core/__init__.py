"""The defense core: activation capture, clean statistics, spatial pooling refinement, fusion."""
