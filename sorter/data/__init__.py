"""Image datasets: reading ImageFolder trees, and the synthetic conveyor-photo generator."""
