"""Thin trigger adapters: binding in, one core call, result out."""
