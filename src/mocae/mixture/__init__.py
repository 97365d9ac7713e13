"""Stage 2: mixing the experts, routing between them and calibrating the router."""
