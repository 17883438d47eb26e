"""Running at cluster scale: configs for an AWS Ray cluster and KubeRay (RayService for the
API, RayJob for offline rendering), the script that generates the KubeRay manifests from
``serve_config.yaml``, and the offline renderer (``cluster.render``, on Ray Data)."""
