from natgwd.kubeovn.shim.cli import main

raise SystemExit(main())
