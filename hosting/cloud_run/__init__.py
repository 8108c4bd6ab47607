"""The Cloud Run tier: ``service.yaml`` (the service), rendered for a deployment by
``render_service`` and checked by ``check_service`` before ``deploy.sh`` applies it."""
