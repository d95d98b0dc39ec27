"""A calibrated simulator of Seesaw runs and a planner over every layout of a node (pure: no torch,
except `measure`, which calibrates a machine with the real engine)."""
