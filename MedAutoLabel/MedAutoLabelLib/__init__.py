"""Slicer glue of MedAutoLabel: scene <-> engine, background runs, dependencies. Imports slicer and vtk, never qt."""
