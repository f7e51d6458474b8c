from tcproxy.cli import main

raise SystemExit(main())
