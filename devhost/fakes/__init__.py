"""Local fakes of SaaS endpoints, speaking their documented wire protocols."""
