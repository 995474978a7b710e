"""The bundled example configs and their data, installed as package data (`polydistill examples DIR`)."""
